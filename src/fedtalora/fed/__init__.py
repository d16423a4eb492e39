"""The federated run: building it from the config (:mod:`.build`), the task x round loop (:mod:`.loop`),
its clients (:mod:`.client`, :mod:`.transport`, :mod:`.faults`), what it records (:mod:`.history`,
:mod:`.tracking`) and its run directory (:mod:`.rundir`)."""
