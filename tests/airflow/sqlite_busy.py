"""SQLite connect args for the live Airflow tests (imported by Airflow via its config).

Scheduler, api-server, dag-processor, triggerer, task processes and the CLI all write one
SQLite file; under load a writer can hold the lock past pysqlite's 5 s default, and the
loser fails with "database is locked". Waiting longer is what a test stack on SQLite needs.
Kept free of imports: every Airflow process imports it.
"""

CONNECT_ARGS = {"timeout": 60}
