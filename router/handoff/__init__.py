"""The handoff desk: incidents accepted durably and delivered to the destination's CAD."""
