"""quantlab.graph_builder."""
