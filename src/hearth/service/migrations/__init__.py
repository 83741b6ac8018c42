"""Alembic migrations of the service database (run with :func:`hearth.service.db.migrate`)."""
