"""The experiment suite (thesis chapter 6 and more): `python -m testbed.experiments`."""
