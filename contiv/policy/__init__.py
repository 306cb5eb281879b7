"""NetworkPolicy: parsing, selectors, compilation into rules over address groups."""
