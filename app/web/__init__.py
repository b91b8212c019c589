"""The worker's web layer: hardened HTTP (`http`), request parsing (`params`), reads of the view
tables (`tables`, `pages`, `routing`, `staleness`) and entities (`entities`); `install` mounts them."""
