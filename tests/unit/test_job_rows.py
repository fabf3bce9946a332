"""A claimed job's row is parsed once per distinct text (kjob.store.claims.job_of_row)."""

import json
import uuid

from kjob.store.claims import job_of_row


def _row(**spec) -> str:
    return json.dumps({
        "id": str(uuid.UUID(int=7)), "tenant": "acme", "slug": "nightly", "enabled": True,
        "created_at": "2026-12-04T00:00:00+00:00", "updated_at": "2026-12-04T00:00:00+00:00",
        "enabled_at": None, "paused_note": None, "paused_at": None,
        "spec": {"slug": "nightly", "agent": "shell", "prompt": "true", "schedule": "@every 1h", **spec},
    })


def test_the_same_row_gives_the_same_job():
    row = _row()
    assert job_of_row(row) is job_of_row(row)


def test_a_changed_row_gives_the_job_as_it_is_now():
    before, after = job_of_row(_row(prompt="say hi")), job_of_row(_row(prompt="say bye"))
    assert (before.prompt, after.prompt) == ("say hi", "say bye")
    assert before != after
