"""Plumbing every part shares: the MQTT link, the audit log, metrics, time and file helpers."""
