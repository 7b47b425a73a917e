"""quantlab.build."""
