"""The ``core`` backend's training: batches (``data``), SAM3's optimizer groups (``optim``) and
schedule (``schedule``), the loop (``loop.train``), checkpoints, DDP, inference and the CLI.
Imports are kept out of this file so that ``angioexp train --help`` stays fast."""
