"""Prediction records: every answer kept without patient data, in SQLite (default) or PostgreSQL,
written off the request path (README, "Prediction records").

``schema`` declares the table, ``migrations`` create it (Alembic), ``store`` talks to the database,
``writer`` batches rows in a thread, ``rows`` turns an answer into its row."""
