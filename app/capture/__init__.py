"""What a service runs, each module importing only those before it: the evented model base
(`model`), the per-model plans and the state SQL (`plans`), ownership and sensitive-column
checks (`ownership`), model/schema agreement (`agreement`), the access log (`access`), the
session listeners (`listeners`), `Database` (`database`), and PostgreSQL roles (`roles`).

Services import the public names from `app.orm`, which re-exports them from here. The capture
triggers that turn a write into an outbox row live with the outbox (`app/outbox/store.py`).
"""
