"""The service API: `from app.orm import EventedBase, Database, sensitive_column, unevented_column`.

DESIGN.md's public contract; the code lives in `app/capture/`, one module per part.
"""
from app.capture.agreement import ModelSchemaMismatch, unevented_column
from app.capture.database import Database
from app.capture.listeners import EventedSession
from app.capture.model import EventedBase
from app.capture.ownership import OwnershipError, UneventedWrite, sensitive_column
from app.capture.plans import SchemaMismatch

__all__ = ["EventedBase", "Database", "EventedSession", "ModelSchemaMismatch", "OwnershipError", "SchemaMismatch",
           "UneventedWrite", "sensitive_column", "unevented_column"]
