"""empath.modules"""
