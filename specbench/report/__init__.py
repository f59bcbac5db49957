"""Turning records into tables (and, later, CSV and plots)."""
