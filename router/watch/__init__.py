"""The watcher: probes, telemetry and declarations in, one immutable centre snapshot out."""
