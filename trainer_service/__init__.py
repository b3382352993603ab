"""The trainer service: RQ workers that train runs and publish each stage's adapter (see README.md)."""
