"""Procedural toy worlds with exact programmatic rewards and tiny shipped base models."""
