"""ResLens training engine and its command line (`python -m train ...`)."""
