"""CAD adapters: one module per way of handing an incident to a force's CAD system."""
