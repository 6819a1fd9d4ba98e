"""`python -m sdqueue_client` is `sdq`."""
import sys

from sdqueue_client.cli import main

sys.exit(main())
