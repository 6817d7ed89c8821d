"""``pneumo-edge listen``: a DICOM node, in three processes. The scoring process: node (wiring,
signals), worker (batch scoring, the results journal), committer (the commit thread), store
(the atomic inbox). The network process (network): scp (who may associate, what is received)
and outbox (the persistent sender). The builder process (builder): the SRs and SCs. child:
how the two helpers start and die with the node; logline: the log line of all three."""
