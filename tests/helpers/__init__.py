"""Plain helpers shared by test modules of several folders (fixtures live in conftest.py)."""
