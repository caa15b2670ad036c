"""Device profiles, the fit check and bundles (installed as ``edgeqlora.devices``)."""
