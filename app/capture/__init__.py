"""What a service imports: the evented model base, `Database`, and the errors they raise.

`app.orm` is the same API under the name DESIGN.md gives it; either import works.
"""
from app.capture.base import EventedBase, EventedSession
from app.capture.database import Database
from app.capture.entities import SchemaMismatch
from app.capture.ownership import OwnershipError, UneventedWrite, sensitive_column

__all__ = ["EventedBase", "Database", "EventedSession", "OwnershipError", "SchemaMismatch",
           "UneventedWrite", "sensitive_column"]
