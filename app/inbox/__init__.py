"""The transactional inbox, the outbox's twin on the consuming side: `store` (its tables and
statements), `events` (what a handler gets), `consumer` (`Inbox`, which applies each event once)."""
