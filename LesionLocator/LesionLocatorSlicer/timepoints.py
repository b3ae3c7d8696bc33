"""Ordering the timepoint volumes of one patient by DICOM study date."""
from __future__ import annotations

import slicer

STUDY_DATE_TAG = "0008,0020"


def studyDate(volumeNode, dicomDatabase=None) -> str:
    """YYYYMMDD of the volume's study ('' if unknown): subject hierarchy study item, else the DICOM database."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volumeNode.GetScene())
    item = shNode.GetItemByDataNode(volumeNode)
    attribute = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMStudyDateAttributeName()
    date = shNode.GetAttributeFromItemAncestor(item, attribute) if item else ""
    if date or dicomDatabase is None:
        return date
    instanceUIDs = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    fileName = dicomDatabase.fileForInstance(instanceUIDs[0]) if instanceUIDs else ""
    return dicomDatabase.fileValue(fileName, STUDY_DATE_TAG) if fileName else ""


def orderTimepoints(volumeNodes: list, dicomDatabase=None) -> tuple[list, str]:
    """(volumes in time order, how they were ordered): by study date when every volume has one, else as given."""
    volumeNodes = [node for node in volumeNodes if node is not None]
    dates = [studyDate(node, dicomDatabase) for node in volumeNodes]
    if volumeNodes and all(dates):
        order = sorted(range(len(volumeNodes)), key=lambda index: dates[index])  # stable: same-day scans keep order
        return [volumeNodes[index] for index in order], "by DICOM study date"
    return volumeNodes, "in the order given (not every volume has a DICOM study date)"
