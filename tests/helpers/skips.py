"""Skip reasons that tell how to run what was skipped."""

# The sam3 package needs torchvision built for its torch, so its tests run in a venv of their own.
SAM3_MISSING = ("needs the sam3 package: run the SAM3 suite in its own venv, as the README's "
                "quick start shows (.venv-sam3/bin/python -m pytest -m sam3 -n 0)")
