"""Cryptography of FAA-DL's anomaly verification: inner-product functional encryption and the
linear all-or-nothing transform."""
