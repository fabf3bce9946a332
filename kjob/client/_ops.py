"""Operations written once for both clients.

A resource (`Jobs`, `Runs`, ...) is generic in its driver. Its methods are decorated with one
of three descriptors, which bind them to the driver of the instance they are read from:

    @operation  a Flow (generator of Requests) -> T        sync: T            async: Awaitable[T]
    @listing    a Paged[T] (page by page)                  sync: Iterator[T]  async: AsyncIterator[T]
    @text_lines a Lines request                            sync: Iterator[str] async: AsyncIterator[str]

The overloads on `__get__` give each client its own, exact signatures (mypy and editors see
`Client().jobs.get(slug) -> JobView` and `AsyncClient().jobs.get(slug) -> Awaitable[JobView]`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeVar, overload

from kjob.client._drivers import AsyncDriver, SyncDriver
from kjob.client._wire import Flow, Lines, Paged

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")
D = TypeVar("D", bound=SyncDriver | AsyncDriver)


class Resource(Generic[D]):
    def __init__(self, driver: D) -> None:
        self._driver: D = driver


def _bound(method: Callable[..., Any], signature: inspect.Signature, call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    del bound.__wrapped__
    bound.__signature__ = signature  # type: ignore[attr-defined]
    return bound


class _Binding(Generic[P, R]):
    """Binds a core method to the driver of the instance it is read from: calling it builds the
    method's Request plan and hands it to the driver's `via` method (run, iterate, lines)."""

    via: ClassVar[str]

    def __init__(self, method: Callable[Concatenate[Any, P], R]) -> None:
        self.method = method
        functools.update_wrapper(self, method)  # type: ignore[arg-type]
        # help() shows the caller's signature: without `self`, and without the plan it returns
        sig = inspect.signature(method)
        self.signature = sig.replace(parameters=list(sig.parameters.values())[1:],
                                     return_annotation=inspect.Signature.empty)

    def _bind(self, obj: Resource[Any] | None) -> Any:
        if obj is None:
            return self
        send, method = getattr(obj._driver, self.via), self.method
        return _bound(method, self.signature, lambda *a, **k: send(method(obj, *a, **k)))


class operation(_Binding[P, Flow[T]], Generic[P, T]):
    via = "run"

    @overload
    def __get__(self, obj: None, owner: type) -> operation[P, T]: ...
    @overload
    def __get__(self, obj: Resource[SyncDriver], owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, obj: Resource[AsyncDriver], owner: type) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, obj: Resource[Any] | None, owner: type) -> Any:
        return self._bind(obj)


class listing(_Binding[P, Paged[T]], Generic[P, T]):
    via = "iterate"

    @overload
    def __get__(self, obj: None, owner: type) -> listing[P, T]: ...
    @overload
    def __get__(self, obj: Resource[SyncDriver], owner: type) -> Callable[P, Iterator[T]]: ...
    @overload
    def __get__(self, obj: Resource[AsyncDriver], owner: type) -> Callable[P, AsyncIterator[T]]: ...
    def __get__(self, obj: Resource[Any] | None, owner: type) -> Any:
        return self._bind(obj)


class text_lines(_Binding[P, Lines]):
    via = "lines"

    @overload
    def __get__(self, obj: None, owner: type) -> text_lines[P]: ...
    @overload
    def __get__(self, obj: Resource[SyncDriver], owner: type) -> Callable[P, Iterator[str]]: ...
    @overload
    def __get__(self, obj: Resource[AsyncDriver], owner: type) -> Callable[P, AsyncIterator[str]]: ...
    def __get__(self, obj: Resource[Any] | None, owner: type) -> Any:
        return self._bind(obj)
