"""IODINE as a Pyro program."""
