"""The network's named options, without torch: the architectures and the options of the card's
``net`` entry. :mod:`pneumo_edge.model.net` builds and checks networks against these tables,
and the CLI offers them as the choices of ``train --arch``, ``--norm`` and ``--tta`` (its help
must work where torch is not installed), so adding a value is one edit here."""

#: torchvision ResNets :func:`pneumo_edge.model.net.build_model` builds (the card's ``arch``)
ARCHS = ("resnet50", "resnet18", "resnet34")
#: the card's ``net`` options (see pneumo_edge.model.net for what each does)
NORMS = ("image", "imagenet")
TTAS = ("none", "flip")
CALIBRATIONS = ("none", "temperature+bias")
OODS = ("none", "mahalanobis", "energy", "mahalanobis+orientation",
        "mahalanobis+layer1+orientation")
