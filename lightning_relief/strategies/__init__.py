"""Lightning strategies of the plugins (one class per module); import them from their modules
or from the top-level package, e.g. ``from lightning_relief import AnalogNoiseStrategy``.

Importing this package registers ``strategy="analog_noise"`` in Lightning's ``StrategyRegistry``."""

from lightning_relief.strategies import analog_noise as _analog_noise  # noqa: F401 - registers "analog_noise"
