"""One module per stage; each reads top to bottom and shares parts through functions, not base classes."""
