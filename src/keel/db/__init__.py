"""PostgreSQL: engine, tables, migrations, the embedded server and the background writer."""

from keel.db.database import Database
from keel.db.migrate import current_revision, head_revision, upgrade
from keel.db.writer import WriteQueue

__all__ = ["Database", "WriteQueue", "current_revision", "head_revision", "upgrade"]
