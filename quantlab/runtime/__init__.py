"""quantlab.runtime."""
