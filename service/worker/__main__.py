"""``python -m service.worker``: one worker process (``eqm worker`` starts and supervises them)."""
import sys

from service.worker.entry import main

sys.exit(main())
