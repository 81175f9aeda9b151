"""The hospital side of medfed: Flower ClientApp, local data access, site commands."""
