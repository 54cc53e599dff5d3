"""Parsers of the raw dataset formats (NWPU VHR-10, DOTA, Pascal-VOC), tiling into "-Split" sets, COCO json writing."""
