"""``make demo``: DDB's whole pipeline on the toy domains, its table and pictures
(``python -m ddb_jax.demo``; :mod:`~ddb_jax.demo.run` runs it, :mod:`~ddb_jax.demo.pictures`
draws)."""
