"""``pneumo-edge listen``: a DICOM node. scp (who may associate, what is received), store
(the atomic inbox), worker (batch scoring, the results journal), outbox (the persistent
sender), node (wiring, signals)."""
