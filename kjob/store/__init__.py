"""PostgreSQL: the schema (`tables`, migrated by `database.migrate`), jobs (`jobs`), the run
ledger (`runs`), API tokens (`tokens`) and the audit log (`audit`). Async only (SQLAlchemy Core
on asyncpg); each store takes an `AsyncEngine` from `database.create_engine`."""
