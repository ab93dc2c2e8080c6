"""The MLflow model registry: registering a model, the promotion gate, its lineage, and loading any model back.

``gate`` (the pure promotion rule), ``versions`` (aliases and finding a version), ``register`` and ``promote``
(the two registry operations), ``lineage`` and ``datasets`` (what made a version), ``reference`` (reading
``models:/`` references), ``resolve`` (any model reference to an embedder or local files) and ``auth_users``
(the users and grants of an MLflow server running with basic auth).
"""
