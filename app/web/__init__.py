"""The worker's web layer: hardened HTTP (`http`), request parsing (`params`), the table views
(`tables`, `pages`, `routing`, `staleness`) and entities (`entities`); `install` mounts them."""
