"""quantlab.cli."""
