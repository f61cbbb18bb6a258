"""The defenses, each a Flower strategy in a module of its own (``layercam_ae``, ``cam_baselines``,
``robust``, ``flame``, ``auror``, ``cosdefense``, ``faa_dl``), registered by run-config name in
``registry``; the glue they share (``base``: screening, sampling and the round's record;
``validation``, ``records``, ``aggregation``); and, in ``detection``, the math they share."""
