"""quantlab.emit."""
