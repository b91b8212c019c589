"""The public name of the service API (`from app.orm import EventedBase, Database`): DESIGN.md's
contract, kept stable while the code lives in `app/capture/`."""
from app.capture import (
    Database,
    EventedBase,
    EventedSession,
    OwnershipError,
    SchemaMismatch,
    UneventedWrite,
    sensitive_column,
)

__all__ = ["EventedBase", "Database", "EventedSession", "OwnershipError", "SchemaMismatch",
           "UneventedWrite", "sensitive_column"]
