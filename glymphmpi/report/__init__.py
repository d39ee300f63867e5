"""Figures (PNG), VTK/XDMF export and cohort summaries. One module per method."""
