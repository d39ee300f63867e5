"""The BIDS App front end: ``glymph bids BIDS_DIR OUTPUT_DIR participant|group``.

* :mod:`.layout`     discovery of participants, sessions, times, images and sidecars;
* :mod:`.inputs`     a participant's images checked and converted to concentration;
* :mod:`.derivatives` the BIDS derivative dataset (names, sidecars, subject TOML);
* :mod:`.app`        the participant and group levels (through the cohort backend);
* :mod:`.cli`        the ``bids``, ``concentration`` and ``synth bids`` subcommands.
"""
