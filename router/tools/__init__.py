"""Tools around the service: the simulator, the demo and the admin client."""
