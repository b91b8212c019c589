"""What a service imports, implemented: the evented model base and its listeners (`base`),
`Database` (`database`), the access log (`access`), entity plans and capture triggers
(`entities`), ownership checks (`ownership`) and PostgreSQL roles (`roles`).

Services import the public names from `app.orm`, which re-exports them from here.
"""
