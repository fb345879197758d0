import sys

from ddb_jax.demo.run import main

sys.exit(main())
