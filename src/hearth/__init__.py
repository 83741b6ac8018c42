"""Hearth: a secure-by-design platform for consumer IoT products.

The package is split the way the system is:

* :mod:`hearth.protocol` - the device <-> cloud contract (topics, schemas, model specs);
* :mod:`hearth.pki` - certificate authorities, unit certificates, revocation;
* :mod:`hearth.factory` - minting unit identities at the factory;
* :mod:`hearth.device` - the runtime a maker ships inside a unit;
* :mod:`hearth.service` - the cloud service (broker, ingest, API);
* :mod:`hearth.cli` - the ``hearth`` command.
"""

from hearth.errors import HearthError

__version__ = "0.1.0"
__all__ = ["HearthError", "__version__"]
